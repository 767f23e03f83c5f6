"""storage: where tensors live: the devices behind the tiers with their byte accounting, the
converted weight store, each weight's home, the KV cache and the activations, and the one copy
path between tiers. Knows no model math. May import: models, kernels, system, core."""
