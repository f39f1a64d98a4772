"""mimiq_mm.losses"""
