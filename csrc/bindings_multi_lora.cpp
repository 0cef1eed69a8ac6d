// peftkern._C: the multi-LoRA entry points (placeholder until its kernels land).
#include "bindings_common.h"

namespace peftkern_bind {

void bind_multi_lora(py::module_& m) { (void)m; }

}  // namespace peftkern_bind
