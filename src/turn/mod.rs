//! STUN/TURN service (SPEC §7).
