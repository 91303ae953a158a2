"""cxrfair.extract"""
