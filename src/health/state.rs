//! Per-server health state machine (fall/rise). 
