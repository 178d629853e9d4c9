"""The coordinator: the Flower ServerApp (`app`), its explicit round loop (`loop`), Flower's
strategies (`strategy`), update screening (`screening`), the run's record (`recorder`) and resume.
"""
