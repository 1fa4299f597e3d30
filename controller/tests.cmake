# Unit tests for controller/ (included from controller/CMakeLists.txt).
muster_unit_test(controller_test
  SOURCES
    api_test.cc
    fleet_test.cc
    dashboard_test.cc
    notifier_test.cc
    metrics_test.cc rollout_test.cc rollout_manager_test.cc store_batch_test.cc
    log_writer_test.cc
    nar_cache_test.cc
    byte_storage_test.cc
    rate_limit_test.cc
    roster_file_test.cc
    operator_set_test.cc
    store_test.cc
    cluster_test.cc
    pg_result_test.cc
  LIBS muster_controller_lib)
