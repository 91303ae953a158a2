"""cxrfair.finetune"""
