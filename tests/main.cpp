// The doctest runner shared by every test file (host and CUDA builds).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
