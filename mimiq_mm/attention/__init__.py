"""mimiq_mm.attention"""
