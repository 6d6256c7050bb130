// Whether the forward running on this thread will get a backward: false under torch.no_grad or when no
// input needs a gradient. The CPU kernels then keep nothing for one (gathered weights, gate tables),
// which would otherwise wait in their caches for a backward that never comes. Set by the Autograd
// kernels (autograd.cpp); a direct call of a forward op (torch.compile's graphs) keeps the default.
#pragma once

namespace cadk {

inline bool& backward_expected() {
  thread_local bool expected = true;
  return expected;
}

class ExpectBackward {
 public:
  explicit ExpectBackward(bool expected) : previous_(backward_expected()) { backward_expected() = expected; }
  ~ExpectBackward() { backward_expected() = previous_; }
  ExpectBackward(const ExpectBackward&) = delete;
  ExpectBackward& operator=(const ExpectBackward&) = delete;

 private:
  bool previous_;
};

}  // namespace cadk
