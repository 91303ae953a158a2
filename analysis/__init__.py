"""cxrfair.analysis"""
