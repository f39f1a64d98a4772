"""mimiq_mm.engine"""
