"""The application layer, imported as ``hessdiag.app``: the ``hessdiag`` command (`cli`) and the demo
runs (`demo`). It sits on top of the engine (``hessdiag``) and the Lightning adapters
(``hessdiag.callbacks``) and imports them; nothing below imports it."""
