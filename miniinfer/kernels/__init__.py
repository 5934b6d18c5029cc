"""Triton GPU kernels. Import the submodules directly (each imports triton); this package
itself stays import-light so CPU-only code paths never pull in triton.

* ``rope``              apply_rope_ (NeoX, in place)
* ``norm``              rms_norm, fused_add_rms_norm_
* ``activation``        silu_and_mul
* ``kv_store``          store_kv_cache (paged KV scatter, slot -1 skipped)
* ``decode_attention``  paged_decode_attention (split-KV flash-decoding, GQA)
* ``extend_attention``  paged_extend_attention (causal prefill / extend over paged KV)

Every module also has a pure-torch ``*_ref`` used by the tests.
"""
