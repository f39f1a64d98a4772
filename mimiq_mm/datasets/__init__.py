"""mimiq_mm.datasets"""
