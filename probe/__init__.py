"""cxrfair.probe"""
