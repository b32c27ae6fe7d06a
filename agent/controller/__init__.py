"""``modelherd controller``: OME's BaseModel status controller for clusters without OME's controller."""
