"""What a run's record looks like to a person: the per-round table, PNG plots, TensorBoard events.

They read history lines only (`common.runfolder`), so the coordinator redraws them after each
round (`server.recorder`) and the tools draw the same from a finished run folder (`tools.report`).
"""
