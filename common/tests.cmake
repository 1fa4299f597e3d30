# Unit tests for common/ (included from common/CMakeLists.txt).
muster_unit_test(common_test
  SOURCES
    crypto_test.cc
    fsutil_test.cc
    json_limits_test.cc
    log_test.cc
    manifest_test.cc
    narinfo_test.cc
    phase_test.cc
    preview_test.cc
    process_test.cc
    protocol_test.cc
    roster_test.cc
    rollout_items_test.cc
    tls_test.cc
    url_test.cc
    utf8_test.cc
    vars_bundle_test.cc
  LIBS muster_common)
