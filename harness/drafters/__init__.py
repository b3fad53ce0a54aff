"""Draft models that read the target's own features (used by both training and decoding).

``harness.drafters.eagle``: the EAGLE-1/2 and EAGLE-3 draft heads, their on-disk formats
(ours = the released ones) and the strict loader.
``harness.drafters.medusa``: the Medusa heads, their on-disk format (ours = the released one)
and the strict loader.
``harness.drafters.chimera``: Chimera's drafter (trigram + full-context encoders, residual heads).
"""
