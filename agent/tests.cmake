muster_unit_test(agent_test
  SOURCES config_test.cc floor_test.cc lifecycle_test.cc link_test.cc state_test.cc vars_test.cc
          system_ops_test.cc health_test.cc
          disk_space_test.cc windows_test.cc preview_test.cc substituter_test.cc
  LIBS muster_agent_lib)
