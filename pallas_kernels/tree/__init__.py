"""Tree attention (SpecInfer verification) and decode attention: api, arguments, masking, reference,
tuning, the portable Triton kernel and the Hopper Mosaic GPU kernel. The public functions are
exported by `pallas_kernels`."""
