// Results of a training forward kept for its backward (gate tables, gathered weights).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

namespace cadk::cpu {

using at::Tensor;

// Tensors a forward computed, each taken by the backward whose key equals the forward's. A key
// holds everything its tensor depends on, so a hit is exact; a miss recomputes. Bounded, oldest
// dropped first, so results of forwards that get no backward cannot pile up.
template <typename Key>
class KeptForBackward {
 public:
  void put(Key key, const Tensor& value) {
    const int64_t bytes = value.nbytes();
    if (bytes > kMaxBytes) return;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {  // a repeated forward replaces
      if (it->first == key) {
        drop(it);
        break;
      }
    }
    while (!entries_.empty() && (bytes_ + bytes > kMaxBytes || int64_t(entries_.size()) >= kMaxEntries)) {
      drop(entries_.begin());
    }
    entries_.emplace_back(std::move(key), value);
    bytes_ += bytes;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.clear();
    bytes_ = 0;
  }

  Tensor take(const Key& key) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {  // backward runs newest-first
      if (!(it->first == key)) continue;
      Tensor value = it->second;  // a copy: drop() counts the bytes of the entry's tensor
      drop(std::next(it).base());
      return value;
    }
    return {};
  }

 private:
  using Entries = std::deque<std::pair<Key, Tensor>>;
  static constexpr int64_t kMaxBytes = int64_t(32) << 20;
  static constexpr int64_t kMaxEntries = 256;

  void drop(typename Entries::iterator it) {
    bytes_ -= it->second.defined() ? int64_t(it->second.nbytes()) : 0;
    entries_.erase(it);
  }

  std::mutex mu_;
  Entries entries_;
  int64_t bytes_ = 0;
};

inline std::vector<int64_t> index_list(const Tensor& alive) {
  const Tensor a = alive.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + a.numel());
}

}  // namespace cadk::cpu
