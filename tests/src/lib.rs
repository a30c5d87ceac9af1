//! Integration-test harness: the reference topology of SPEC section 7 in network namespaces.
