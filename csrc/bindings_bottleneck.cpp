// peftkern._C: the bottleneck adapter entry points (placeholder until its kernels land).
#include "bindings_common.h"

namespace peftkern_bind {

void bind_bottleneck(py::module_& m) { (void)m; }

}  // namespace peftkern_bind
