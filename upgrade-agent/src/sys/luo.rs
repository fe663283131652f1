//! `/dev/liveupdate` (LUO) ioctls.
