"""mimiq_mm.quant"""
