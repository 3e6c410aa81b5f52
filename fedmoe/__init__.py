"""fedmoe: federated, privacy-preserving fine-tuning of sparse Mixture-of-Experts language models.

One import namespace for the whole project (never a generic top-level name such as `kernels` or
`model`, which would shadow other distributions; Hugging Face's `kernels` is one transformers needs).
The parts, each one concern, imports going one way (docs/architecture.md):

    fedmoe.protocol   what server and banks share (torch-free, TenSEAL-free)
    fedmoe.kernels    MoE ops: Triton kernels + the PyTorch reference each one must match
    fedmoe.model      the MoE transformer, checkpoints, LoRA, export/generate
    fedmoe.crypto     keys, secure aggregation (masks, Shamir, BFV), CKKS
    fedmoe.fl_client  a bank: policy, data, DP training, its side of secure aggregation
    fedmoe.fl_server  the Flower ServerApp, launcher, deployment kits (imports nothing that decrypts)
    fedmoe.audit      the privacy officer's tools

This package imports nothing itself, so `import fedmoe.protocol` stays torch-free.
"""

__version__ = "0.1.0"
