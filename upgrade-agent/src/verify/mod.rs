//! Kernel image verification: bzImage header, sealed memfd, signed manifests.
