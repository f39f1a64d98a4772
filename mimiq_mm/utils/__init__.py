"""mimiq_mm.utils"""
