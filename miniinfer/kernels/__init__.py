"""Triton GPU kernels. Import the submodules directly (each imports triton); this package
itself stays import-light so CPU-only code paths never pull in triton.

* ``rope``              apply_rope_ (NeoX, in place)
* ``norm``              rms_norm, fused_add_rms_norm_
* ``activation``        silu_and_mul
* ``kv_store``          store_kv_cache (paged KV scatter, slot -1 skipped)
* ``decode_attention``  paged_decode_attention (split-KV flash-decoding, GQA)
* ``extend_attention``  paged_extend_attention (causal prefill / extend over paged KV),
                        paged_prefix_attention (cached prefix only, LSE merge: the split prefill)
* ``rope_kv_store``     rope_store_kv_cache_ (RoPE of q/k + the paged KV store in one kernel)
* ``gemv``              gemv (decode linears of 1-2 rows, split-K)
* ``allreduce_norm``    allreduce_add_rms_norm_ (TP: all-reduce + residual add + RMSNorm, symmetric memory)
* ``sampling``          the fused CUDA sampler

Every module also has a pure-torch ``*_ref`` used by the tests.
"""
