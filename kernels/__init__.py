"""lazymerge.kernels"""
