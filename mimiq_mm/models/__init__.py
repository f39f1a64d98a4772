"""mimiq_mm.models"""
