"""mimiq_mm.synthesis"""
