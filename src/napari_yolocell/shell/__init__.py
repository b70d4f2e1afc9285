"""The napari shell: reader, layer building and widgets. The only subpackage that imports
napari, qtpy or magicgui.
"""
