// Health checks run while a deploy is confirming: commands (exit 0 within the
// timeout) and HTTP GETs (2xx within the timeout). Thread-compatible.
#pragma once

#include <string>
#include <vector>

#include "agent/config.h"
#include "common/process.h"

namespace muster {

struct HealthReport {
  bool ok = true;
  std::string detail;  // "all 2 health checks passed" or which one failed and why
};

HealthReport RunHealthChecks(const std::vector<HealthCheck>& checks, ProcessRunner& runner);

// One HTTP GET on a plain http:// URL; returns the status code or an error.
Result<int> HttpGetStatus(const std::string& url, std::chrono::milliseconds timeout);

}  // namespace muster
