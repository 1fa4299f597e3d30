// Installing vars (secrets) bundles into the target directory.
//
// The bundle is opened with the machine key, validated entry by entry, written
// into a staging directory beside the target (0700 dirs, files with their
// modes/owners), fsynced, and swapped in with one rename. The previous content
// is kept beside the target as "<target>.muster-previous" so that a rollback
// can swap it back. A hidden ".muster-vars-hash" file inside the target records
// which bundle it holds, so an interrupted install is not repeated.
#pragma once

#include <string>

#include "common/crypto.h"
#include "common/error.h"
#include "common/vars_bundle.h"

namespace muster {

struct VarsInstallResult {
  bool changed = false;  // false: the target already held this bundle
  std::size_t files = 0;
};

// Opens and validates a base64 sealed box; does not touch the file system.
Result<VarsBundle> OpenVars(const SecretKey& key, const std::string& sealed_b64);

// OK when the bundle names no target or exactly vars_dir; otherwise an error
// saying which directory the operator meant and what to set.
Status CheckVarsTarget(const VarsBundle& b, const std::string& vars_dir);

Result<VarsInstallResult> InstallVars(const SecretKey& key, const std::string& sealed_b64,
                                      const std::string& vars_hash, const std::string& target);

// Swaps the previous content back in. OK (and a no-op) when none was kept.
Status RestoreVars(const std::string& target);

// Deletes the previous content kept beside target, once no rollback can need
// it (a rotated secret must not linger). OK (and a no-op) when none was kept.
Status DiscardPreviousVars(const std::string& target);

}  // namespace muster
