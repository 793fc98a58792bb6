"""Lightning adapters over the hessdiag engine, imported as ``hessdiag.callbacks``."""
