"""The engine bundle's format, shared by the build step (build_engine/) and the daemon (daemon/).

bundle.py: the manifest, its checksums, loading and verification; kv_cache.py: the KV cache's geometry;
decode_buckets.py: the batch sizes a decode step runs at; trt_plan.py: what a TensorRT engine for a bundle
looks like (profiles, buffers, memory budget, compatibility). It imports neither build_engine nor daemon,
and needs no GPU.
"""
