"""Model presets known to the registry (``--model NAME``). Any other hub id or local
path works through ``model.path=...``; the zoo loads exactly like any HF model."""

from harness.config import ModelConfig

# An untrained Llama built from zoo/random-tiny/config.json (random weights, seeded):
# fast, and only good for plumbing and losslessness tests. Every output labels it.
RANDOM_TINY = ModelConfig(name="random-tiny (UNTRAINED)", path="zoo/random-tiny", random_init=True)

# The shipped zoo: small Llamas trained here on real source code. They load
# through the same path as any Hugging Face model.
ZOO_TARGET = ModelConfig(name="zoo-target", path="zoo/target", draft="zoo-draft")
ZOO_DRAFT = ModelConfig(name="zoo-draft", path="zoo/draft")
# Later zoo members: the SPACE fine-tune of the zoo target (generate with `space`; the
# losslessness reference is then autoregressive decoding of this same fine-tuned model).
ZOO_SPACE = ModelConfig(name="zoo-space", path="zoo/target-space")
# The COrAL fine-tune of the zoo target (generate with `coral`; the reference is this model's own greedy decoding).
ZOO_CORAL = ModelConfig(name="zoo-coral", path="zoo/target-coral")
