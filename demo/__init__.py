"""lazymerge.demo"""
