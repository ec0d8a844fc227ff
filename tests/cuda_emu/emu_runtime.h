// The emulator's state that the driver (driver.cpp) reads and sets.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace emu {
struct Buffer {
  const void* data;
  size_t bytes;
};
extern int g_order;                      // thread order within a barrier epoch: 0 forward, 1 reverse, 2 alternating
extern std::vector<std::string> g_errors;  // barrier, shared-memory, load and launch errors (the first 20)
extern std::vector<Buffer> g_buffers;      // the device buffers __ldg may read
}  // namespace emu
