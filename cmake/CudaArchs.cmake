# Per-source CUDA architecture gating.
#
# GEMMA4X_CUDA_ARCHS lists the targets (e.g. "90a;100a"). A source named *_sm90.cu holds code
# that only Hopper runs (wgmma, TMA-multicast tuning): it is compiled for the 90-family entries
# alone. *_sm100.cu likewise for 100-family (tcgen05). Every other .cu is portable and compiled
# for all listed archs. A source whose family is absent from the list is left out of the build,
# and GEMMA4X_HAS_SM90 / GEMMA4X_HAS_SM100 tell the bindings which families exist.

function(gemma4x_arch_family arch out_var)
  string(REGEX MATCH "^[0-9]+" num "${arch}")
  if(num GREATER_EQUAL 100)
    set(${out_var} "sm100" PARENT_SCOPE)
  elseif(num GREATER_EQUAL 90)
    set(${out_var} "sm90" PARENT_SCOPE)
  else()
    set(${out_var} "older" PARENT_SCOPE)
  endif()
endfunction()

function(gemma4x_gencode_flags archs out_var)
  set(flags "")
  foreach(arch IN LISTS archs)
    list(APPEND flags "-gencode=arch=compute_${arch},code=sm_${arch}")
  endforeach()
  set(${out_var} "${flags}" PARENT_SCOPE)
endfunction()

# Adds `sources` to `target`, each with the gencode flags its file name allows.
# Sets GEMMA4X_HAS_SM90 / GEMMA4X_HAS_SM100 in the caller's scope.
function(gemma4x_add_cuda_sources target)
  set(sm90_archs "")
  set(sm100_archs "")
  foreach(arch IN LISTS GEMMA4X_CUDA_ARCHS)
    gemma4x_arch_family(${arch} family)
    if(family STREQUAL "sm90")
      list(APPEND sm90_archs ${arch})
    elseif(family STREQUAL "sm100")
      list(APPEND sm100_archs ${arch})
    endif()
  endforeach()

  foreach(src IN LISTS ARGN)
    get_filename_component(name "${src}" NAME_WE)
    if(name MATCHES "_sm90$")
      set(archs "${sm90_archs}")
    elseif(name MATCHES "_sm100$")
      set(archs "${sm100_archs}")
    else()
      set(archs "${GEMMA4X_CUDA_ARCHS}")
    endif()
    if(archs STREQUAL "")
      message(STATUS "gemma4x: skipping ${src} (no matching arch in '${GEMMA4X_CUDA_ARCHS}')")
      continue()
    endif()
    gemma4x_gencode_flags("${archs}" flags)
    set_source_files_properties("${src}" PROPERTIES COMPILE_OPTIONS "${flags}")
    target_sources(${target} PRIVATE "${src}")
  endforeach()

  if(sm90_archs)
    set(GEMMA4X_HAS_SM90 ON PARENT_SCOPE)
  endif()
  if(sm100_archs)
    set(GEMMA4X_HAS_SM100 ON PARENT_SCOPE)
  endif()
endfunction()
