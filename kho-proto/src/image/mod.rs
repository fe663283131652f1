//! The handover image: header, region table, payloads, manifest and signature.
