"""lazymerge.engine"""
