// The page hash: a 64-bit, non-cryptographic content hash of one page, used for the
// commitment digest (both sides hash every page they send or receive) and for change
// detection. XXH64 runs at ~4 GB/s per core here, which on a 2-core host costs more CPU than
// the TCP copy it accompanies; this hash keeps 16 independent 64-bit lanes (multiply of the
// 32-bit halves plus a rotated add, the structure XXH3 uses for long inputs) that the
// compiler maps onto AVX-512 or AVX2 registers. Every variant computes the same value.
// Layout and constants are specified in docs/PROTOCOL.md ("Page hash").
#pragma once

#include <cstddef>
#include <cstdint>

namespace livemig {

// Hash of `len` bytes; len must be a multiple of 128 (every supported page size is).
uint64_t PageHash(const uint8_t* p, size_t len);

// The variants this CPU can run, for tests: writes up to 3 hashes, returns how many.
int PageHashVariants(const uint8_t* p, size_t len, uint64_t* out);

}  // namespace livemig
