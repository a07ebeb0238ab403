# CUTLASS / CuTe headers: CUTLASS_DIR (a CUTLASS checkout or install prefix, cache variable or
# environment) wins; otherwise the headers shipped inside the `nvidia-cutlass` Python package
# (cutlass_library/source/include), which pyproject.toml lists as a build requirement. The package
# is located without importing it: its __init__ pulls in generator modules we do not need.

function(gemma4x_find_cutlass out_var)
  set(candidates "")
  if(DEFINED CUTLASS_DIR AND NOT CUTLASS_DIR STREQUAL "")
    list(APPEND candidates "${CUTLASS_DIR}/include" "${CUTLASS_DIR}")
  elseif(DEFINED ENV{CUTLASS_DIR})
    list(APPEND candidates "$ENV{CUTLASS_DIR}/include" "$ENV{CUTLASS_DIR}")
  else()
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
              "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))"
      OUTPUT_VARIABLE from_pkg
      OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE rc
      ERROR_QUIET)
    if(rc EQUAL 0)
      list(APPEND candidates "${from_pkg}")
    endif()
  endif()
  foreach(dir IN LISTS candidates)
    if(EXISTS "${dir}/cutlass/cutlass.h" AND EXISTS "${dir}/cute/tensor.hpp")
      set(${out_var} "${dir}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  message(FATAL_ERROR
    "gemma4x: CUTLASS headers not found (looked in: '${candidates}'). Install the `nvidia-cutlass` "
    "package into the build environment or set CUTLASS_DIR to a CUTLASS checkout.")
endfunction()
