# Debian package (CPack DEB generator), included from the top-level CMakeLists.txt.
#
#   cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMUSTER_BUILD_BENCH=OFF
#   ninja -C build/release && (cd build/release && cpack -G DEB)
#
# The binaries come from install(TARGETS …) in controller/ and agent/; this file adds the
# systemd units, example configurations, the sysusers entry and the maintainer scripts,
# which create the `muster` user and the state directories and start nothing.

option(MUSTER_INSTALL_SYSTEM_FILES
  "Install systemd units to /lib/systemd/system and examples to /etc/muster (absolute paths)" ON)
option(MUSTER_DEB_SHLIBDEPS
  "Compute the package's Depends with dpkg-shlibdeps instead of the Debian 12 list" OFF)

set(_pkg ${CMAKE_CURRENT_LIST_DIR})

if(MUSTER_INSTALL_SYSTEM_FILES)
  install(FILES ${_pkg}/systemd/muster-agent.service ${_pkg}/systemd/muster-controller.service
          DESTINATION /lib/systemd/system)
  install(FILES ${_pkg}/examples/agent.json.example ${_pkg}/examples/controller.json.example
          DESTINATION /etc/muster)
  install(FILES ${_pkg}/debian/muster.sysusers
          DESTINATION lib/sysusers.d RENAME muster.conf)
endif()
install(FILES ${_pkg}/launchd/org.muster.agent.plist
        DESTINATION ${CMAKE_INSTALL_DATADIR}/muster/launchd)
install(FILES ${PROJECT_SOURCE_DIR}/docs/PACKAGING.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR} OPTIONAL)

# The example configurations are conffiles: dpkg keeps an admin's edits on upgrade.
set(_conffiles ${CMAKE_CURRENT_BINARY_DIR}/packaging/debian/conffiles)
file(WRITE ${_conffiles} "/etc/muster/agent.json.example\n/etc/muster/controller.json.example\n")

set(CPACK_GENERATOR "DEB" CACHE STRING "CPack generators")
set(CPACK_PACKAGE_NAME "muster")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_VENDOR "muster")
set(CPACK_PACKAGE_CONTACT "muster maintainers <muster@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "pull deployer for NixOS and nix-darwin fleets")
set(CPACK_PACKAGE_DESCRIPTION
  "muster-agent keeps one outbound TLS websocket to a muster-controller, receives the
system generation an operator signed for its machine together with its secrets,
realises it from a binary cache, activates, confirms or rolls back. This package
holds the agent, the controller, the operator CLI (muster) and their systemd units.
No service starts before /etc/muster/agent.json or controller.json exists.")
set(CPACK_PACKAGING_INSTALL_PREFIX "/usr")
set(CPACK_STRIP_FILES ON)

set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION "admin")
set(CPACK_DEBIAN_PACKAGE_PRIORITY "optional")
if(MUSTER_DEB_SHLIBDEPS)
  set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
  set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser")
else()
  # What the binaries link on Debian 12 (objdump -p | NEEDED, then dpkg -S);
  # tests/packaging/check-deb.sh fails when a linked library is missing here.
  set(CPACK_DEBIAN_PACKAGE_DEPENDS
    "libc6 (>= 2.36), libstdc++6 (>= 12), libgcc-s1 (>= 3.0), libssl3 (>= 3.0.0), libsodium23 (>= 1.0.18), libsqlite3-0 (>= 3.40), libpq5 (>= 15), libzstd1 (>= 1.5.4), libspdlog1.10 (>= 1:1.10.0), libfmt9 (>= 9.1.0), adduser")
endif()
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "nix-bin | nix")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
  ${_pkg}/debian/postinst ${_pkg}/debian/prerm ${_pkg}/debian/postrm ${_conffiles})
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)

include(CPack)
