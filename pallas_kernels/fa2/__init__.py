"""FlashAttention-2: api, arguments, masking, reference, block sizes, the autotuner, the portable
Triton kernels and the Hopper Mosaic GPU forward. The public functions are exported by
`pallas_kernels`."""
