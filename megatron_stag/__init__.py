"""megatron-stag: StagFormer (staggered sections) and AltUp for megatron-core 0.19.

Importing the package is cheap: nothing here imports torch or megatron. Entry points live in
`megatron_stag.cli`; the model is `megatron_stag.models.stagformer_model.StagFormerModel`.
"""

__version__ = "0.1.0"
