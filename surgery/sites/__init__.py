"""Reading Hugging Face attention modules: the part of surgery that knows transformers' attention layers.

| module | reads |
|---|---|
| ``attention`` | any attention module into one ``AttentionSite``: dims, layout (separate or fused q/k/v), weights |
| ``latent`` | multi-head latent attention (DeepSeek-V3's MLA): the low-rank q/kv sub-graph |
| ``rotary`` | how a ``forward`` applies its positions: rotate-half, the model's own function, none, latent |
| ``attention_extras`` | what some layers do around ``o_proj``: output gates, norms, sink logits, separate biases |
| ``key_selection`` | learned key selection (a DSA indexer: each query sees the top-k keys it scores) |

Mixers and weight maps read a site, never a Hugging Face module; a new architecture's layout is added here. Imports
torch and transformers and nothing of surgery's above ``errors``.
"""
