"""Methods: one module per published method, each on top of the one capture / intervention mechanism.

=====================  ==================================================================
module                 method
=====================  ==================================================================
``mechanistic``        log-prob increase of layers, heads, positions (Yu & Ananiadou 2024)
``neurons``            FFN neuron attribution (Yu & Ananiadou, EMNLP 2024)
``logit_lens``         visual tokens in vocabulary space
``raw_attention``      raw attention maps (LVLM-Interpret 2024)
``relevancy``          relevancy maps (Chefer et al. 2021, via LVLM-Interpret)
``causal``             causal interpretation (CLEANN, via LVLM-Interpret)
``igos``               iGOS+ / iGOS++ for open-ended answers (Xing et al. 2025)
``token_selection``    visually relevant answer tokens (Xing et al. 2025)
``scoring``            black-box scoring: pixels -> answer log-probs; baselines
``ablation``           head / block / image-token ablation studies
``head_claims``        the head-level increase ranking tested by zeroing each top head
``knockout``           attention knockout between token groups (Zhang et al. 2025)
``patching``           activation patching with clean / corrupted pairs (Basu 2024; Golovanevsky 2025)
``tam``                Token Activation Maps (Li et al., ICCV 2025)
=====================  ==================================================================

The public functions are exported from :mod:`mech_vqa` itself (submodules keep their own names:
``mech_vqa.methods.relevancy`` is the module, ``mech_vqa.relevancy`` the function).
"""

PATCH_METHODS = ("mechanistic", "logit_lens", "raw_attention", "relevancy", "causal", "igos+", "igos++", "tam")
"""The patch-importance methods :func:`mech_vqa.compare.compare` runs by default (named here, where
importing costs nothing, so that the command line's help can list them without torch)."""
