"""Interactive views of results: self-contained HTML files, notebook displays and a local app.

* ``result.to_html(path)`` / ``result._repr_html_()`` on every result: :mod:`mech_vqa.explorer.html`;
* :func:`answer_view`: every answer token of one input explained, in one linked view;
* ``mech-vqa explore``: the local app (:mod:`mech_vqa.explorer.app`, standard library only).
"""

from .answer import AnswerView, answer_view
from .html import repr_html, to_html
from .payload import payload_of

__all__ = ["AnswerView", "answer_view", "payload_of", "repr_html", "to_html"]
