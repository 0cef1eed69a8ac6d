// peftkern._C: the prompt_concat / prefix_kv entry points (placeholder until its kernels land).
#include "bindings_common.h"

namespace peftkern_bind {

void bind_prompt(py::module_& m) { (void)m; }

}  // namespace peftkern_bind
